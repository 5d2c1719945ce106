// Host-emulation build of the CUDA kernels (convmixer_ext._C_emu): the very same source,
// compiled as C++20 with the emulator of cmx_device.h, registered for CPU tensors.
#define CMX_HOST_EMULATION 1
#include "fused_dw.cu"
