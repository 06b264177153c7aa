// Included first in every translation unit of both libraries (setup.py: -include), so that a
// wheel built on a new glibc loads on glibc 2.28 (manylinux_2_28: RHEL 8 and its rebuilds,
// Ubuntu 20.04 on; torch's own wheels target it too).
//
// The oldest glibc a library loads on is the newest symbol version it references. Built here
// (glibc 2.36, GCC 12), three references set it past 2.28, none of them needed:
//   dlsym@GLIBC_2.34  torch's stable headers look up newer shims with dlsym(RTLD_DEFAULT);
//                     2.34 only moved dlsym from libdl into libc under a new version name.
//   pow@GLIBC_2.29    the same pow without the SVID error wrapper; -fno-math-errno and
//                     finite arguments make the two return the same bits.
//   __libc_single_threaded@GLIBC_2.32
//                     libstdc++ 12's headers skip the atomic in shared_ptr reference counts
//                     while glibc says the process has one thread.
// The first two are bound to their oldest version (2.2.5, x86_64's first). For the third each
// library defines its own flag, hidden and always 0 ("maybe threaded"), so reference counts are
// always atomic: what the same headers do on a glibc without the flag, as in the manylinux_2_28
// image's toolchain. tools/check_wheel.sh checks the result with `auditwheel show`.
#pragma once

#if defined(__linux__) && defined(__x86_64__) && !defined(__CUDA_ARCH__)
__asm__(".symver dlsym,dlsym@GLIBC_2.2.5");
__asm__(".symver pow,pow@GLIBC_2.2.5");

#ifdef __cplusplus
extern "C" {
#endif
// Weak: every translation unit has this definition and the linker keeps one per library.
__attribute__((weak, visibility("hidden"))) char __libc_single_threaded = 0;
#ifdef __cplusplus
}
#endif
#endif
