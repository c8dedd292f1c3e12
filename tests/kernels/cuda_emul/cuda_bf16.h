// cuda_bf16.h for the CPU emulation: __nv_bfloat16 is in cuda_emul.h.
#pragma once
#include "cuda_emul.h"
