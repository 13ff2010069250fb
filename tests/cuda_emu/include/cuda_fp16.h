// Host emulation of the CUDA header of this name: everything lives in lk_emu.h.
#pragma once
#include "../lk_emu.h"
