// Host stand-in for cuda_fp16.h (see emulation.h): IEEE binary16 through GCC's _Float16.
#pragma once

struct __half {
  _Float16 value;
};

inline float __half2float(__half x) { return float(x.value); }
inline __half __float2half_rn(float x) { return __half{static_cast<_Float16>(x)}; }
