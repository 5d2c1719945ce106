// Host-emulation build of the CUDA kernel library (convmixer_ext/_cmx_emu.so): the very same
// source and C ABI, compiled as C++20 with the emulator of cmx_device.h; pointers are host
// memory (CPU tensors).
#define CMX_HOST_EMULATION 1
#include "fused_dw.cu"
