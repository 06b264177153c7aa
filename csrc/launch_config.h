// Process-wide launch settings of the CUDA multi-tensor kernels, kept in the host part of
// fastopt._C so a benchmark can change them between launches without a rebuild.
#pragma once

namespace fastopt {

// Blocks per SM of the persistent multi-tensor grids. 0 (the default) means as many as are
// resident at once, from the occupancy calculator; n > 0 launches n blocks per SM (more than
// are resident run as further waves, picked up by the hardware block scheduler as SMs free
// up). Any value gives the same results: blocks walk the chunks with a grid-stride loop and
// every element's arithmetic and every reduction order is fixed by its chunk, not its block.
// Set through fastopt._C._set_grid_blocks_per_sm, for tuning sweeps (bench/sweep_grid.py).
int grid_blocks_per_sm();

}  // namespace fastopt
