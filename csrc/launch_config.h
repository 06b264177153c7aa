// Process-wide launch settings of the CUDA multi-tensor kernels, kept in fastopt._C so a
// benchmark can change them between launches without a rebuild.
#pragma once

namespace fastopt {

// Blocks per SM of the persistent multi-tensor grids. 0 (the default) means as many as are
// resident at once, from the occupancy calculator; n > 0 launches n blocks per SM (more than
// are resident run as further waves, picked up by the hardware block scheduler as SMs free
// up). Any value gives the same results: blocks walk the chunks with a grid-stride loop and
// every element's arithmetic and every reduction order is fixed by its chunk, not its block.
// Set through fastopt._C._set_grid_blocks_per_sm, for tuning sweeps (bench/sweep_grid.py).
// Defined in fastopt._C_cuda (csrc/cuda/module.cpp).
int grid_blocks_per_sm();

// The setting is a std::atomic<int> in fastopt._C (csrc/ops.cpp), which fastopt._C_cuda finds
// through a PyCapsule of this name (the capsule's name is the module path of its attribute).
inline constexpr const char* kGridSettingCapsule = "fastopt._C._grid_blocks_per_sm";

}  // namespace fastopt
