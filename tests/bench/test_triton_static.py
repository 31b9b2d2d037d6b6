"""bench/triton_static.py's parts that need no `triton` package: the TTIR capture of an exported kernel
(with its custom call's num_warps / num_stages), the SASS load census, resources and the occupancy model
against hand-worked figures. (Compiling the TTIR needs the pip `triton` wheel, not a jaxllm dependency.)"""
import os
import sys

from bench import triton_static as ts

SASS = """
        /*0100*/                   LDG.E R0, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E.U16 R3, desc[UR4][R4.64] ;
        /*0120*/                   LDG.E.128 R4, desc[UR4][R6.64] ;
        /*0130*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;
        /*0140*/                   LDGSTS.E.64 [R7], desc[UR4][R8.64] ;
        /*0150*/                   LDGDEPBAR ;
        /*0160*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0170*/                   STG.E.128 desc[UR4][R2.64], R8 ;
"""


def test_sass_counts_loads_by_width_not_the_barrier():
    assert ts.sass_counts(SASS) == {"loads": {"LDG.128": 1, "LDG.16": 1, "LDG.32": 1, "LDGSTS.128": 1, "LDGSTS.64": 1},
                                    "mma": 1}


def test_resources_and_occupancy():
    assert ts.resources(" Function k:\n  REG:96 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:624") == \
        {"reg": 96, "stack": 0, "local": 8}
    # 96 registers x 32 lanes = 3072 a warp, 4 warps: 65536 // 12288 = 5; 38 KiB + 1 KiB reserved: 5 fit in 228 KiB
    assert ts.occupancy(96, 38912, 4) == {"programs_per_sm": 5, "warps_per_sm": 20, "limited_by": "registers"}
    # 128 registers: 4 by registers; 72 KiB + 1: 3 by shared memory
    assert ts.occupancy(128, 73728, 4) == {"programs_per_sm": 3, "warps_per_sm": 12, "limited_by": "shared"}
    # 8 warps: 41 registers x 32 = 1312, allocated in units of 256: 1536 a warp, 65536 // (1536 * 8) = 5
    # (40 registers: 1280 a warp, 6)
    assert ts.occupancy(41, 0, 8) == {"programs_per_sm": 5, "warps_per_sm": 40, "limited_by": "registers"}
    assert ts.occupancy(40, 0, 8)["programs_per_sm"] == 6


def test_capture_reads_each_kernel_with_its_warps_and_stages():
    fn, args = ts.CASES["mixed_8b"]()  # a mixed batch: the decode kernel's rows, then the prefill kernel's
    kernels = ts.capture(fn, *args)
    assert [k["name"] for k in kernels] == ["jaxllm_paged_decode", "jaxllm_paged_prefill"]
    for k in kernels:
        assert k["ttir"].startswith("module") and "tt.func public @" + k["name"] in k["ttir"]
        assert (k["num_warps"], k["num_stages"]) == (4, 2)  # the attention kernels' defaults
        assert len(k["grid"]) >= 2 and all(g >= 1 for g in k["grid"])
    fn, args = ts.CASES["quant_int8_m1"]()
    [k] = ts.capture(fn, *args)
    assert (k["name"], k["num_warps"], k["num_stages"]) == ("jaxllm_small_m_matmul", 4, 3)
    assert k["grid"] == [15360 // 128, 5]  # 120 column tiles x 5 splits: 600 programs, TARGET_PROGRAMS 528


def test_importing_it_leaves_bench_off_sys_path():
    """A bench module imported by the tests must not put bench/ on sys.path: bench/serving.py would then
    shadow the `serving` package for every later test in the process (66 errors in one fresh-clone run)."""
    bench = os.path.dirname(os.path.abspath(ts.__file__))
    assert bench not in [os.path.abspath(p or ".") for p in sys.path]
    import serving
    assert os.path.isdir(os.path.dirname(serving.__file__)) and serving.__file__.endswith(os.path.join("serving", "__init__.py"))
