// Decode attention over a bf16 cache: its launcher, instantiated in a
// translation unit of its own (decode_attention.cuh).
#include "decode_attention.cuh"

namespace dcc_attn {
namespace detail {
template DCC_ATTN_LAUNCH_D(1);
}  // namespace detail
}  // namespace dcc_attn
