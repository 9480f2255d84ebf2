/* The kernels of every SIMD path of CPA_ISAS (platform.h), each compiled
 * for its own target: the includer defines CPA_ISA_BODY (the file that
 * compiles one path's kernels, e.g. "forward_isa.h") and includes this once.
 * Per path: ISA_TAG (the tag in CPA_ISAS), the vector width VBYTES, the
 * register-tile rows MR, the unroll NV, whether F16C converts halves, the
 * compiler target, and for avx512bf16 that only the bfloat16 kernels differ
 * from avx512's (CPA_REGION_BF16_ONLY) and may use vdpbf16ps; amx is that
 * region again with the tiled kernel's two products on AMX tiles
 * (CPA_HAS_AMX, amx_t.h). */
#include "platform.h"

#define ISA_TAG base            /* SSE2 on x86-64, NEON on aarch64 */
#define VBYTES 16
#define MR 4
#define CPA_HAS_F16C 0
#include "isa_region_one.h"

#if CPA_X86
#define ISA_TAG avx2
#define VBYTES 32
#define MR 6
#define CPA_HAS_F16C 1
#define CPA_ISA_TARGET "avx2,fma,f16c"
#include "isa_region_one.h"

#define ISA_TAG avx512
#define VBYTES 64
#define MR 8
#define CPA_HAS_F16C 1
#define CPA_ISA_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#include "isa_region_one.h"
#endif

#if CPA_HAVE_BF16_TARGET
#define ISA_TAG avx512bf16
#define VBYTES 64
#define MR 8
#define CPA_HAS_F16C 1
#define CPA_HAS_DPBF16 1
#define CPA_REGION_BF16_ONLY 1
#define CPA_ISA_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c"
#include "isa_region_one.h"
#endif

#if CPA_HAVE_AMX_TARGET
/* the tile instructions are inline assembly (amx_t.h): no compiler target
 * beyond avx512bf16's is needed */
#define ISA_TAG amx
#define VBYTES 64
#define MR 8
#define CPA_HAS_F16C 1
#define CPA_HAS_DPBF16 1
#define CPA_HAS_AMX 1
#define CPA_REGION_BF16_ONLY 1
#define CPA_ISA_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c"
#include "isa_region_one.h"
#endif
