#pragma once

/// Marks a symbol exported from libtorch_batchnorm.
#if defined(_WIN32)
#if defined(TBN_BUILDING_LIBRARY)
#define TBN_API __declspec(dllexport)
#else
#define TBN_API __declspec(dllimport)
#endif
#else
#define TBN_API __attribute__((visibility("default")))
#endif
