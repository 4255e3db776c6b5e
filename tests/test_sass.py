"""echo_kernels.sass: loops found in SASS text, what their bodies count, and CTAs per SM; on kernels
really compiled for sm_80 and sm_90 it runs in tests/test_attention.py::test_aot_compile_report."""

import pytest

from echo_kernels import sass

# The shape of nvdisasm's output: a prologue, an outer loop holding a tensor-core product and an inner
# loop, a separate loop without one (like the slow path of a sine), a forward branch out.
SASS = """
        .text.kernel:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/              @!P0 BRA `(.L_x_3) ;
.L_x_0:
        /*0030*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0040*/                   LDG.E.U16 R8, desc[UR4][R10.64] ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
        /*0060*/                   MUFU.EX2 R9, R9 ;
.L_x_1:
        /*0070*/                   MUFU.SIN R11, R11 ;
        /*0080*/                   NOP ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
        /*00a0*/                   UTMALDG.2D [UR8], [UR10] ;
        /*00b0*/               @P2 BRA `(.L_x_0) ;
.L_x_2:
        /*00c0*/                   MUFU.COS R13, R13 ;
        /*00d0*/               @P3 BRA `(.L_x_2) ;
.L_x_3:
        /*00e0*/                   EXIT ;
"""


def test_parse_reads_addresses_opcodes_and_labels():
    instructions, labels = sass.parse(SASS)
    assert [i.address for i in instructions] == list(range(0, 0xF0, 0x10))
    assert instructions[2].opcode == "BRA" and instructions[4].opcode == "LDG.E.U16"
    assert labels == {".L_x_0": 0x30, ".L_x_1": 0x70, ".L_x_2": 0xC0, ".L_x_3": 0xE0}


def test_code_size_counts_every_instruction():
    assert sass.code_size(SASS) == 15 and sass.code_size("") == 0


def test_loops_are_backward_branches():
    assert sass.loops(*sass.parse(SASS)) == [(0x30, 0xB0), (0x70, 0x90), (0xC0, 0xD0)]


def test_main_loops_count_a_loop_with_tensor_core_instructions_and_what_it_nests():
    (loop,) = sass.main_loops(SASS)  # the inner loop is counted in it; the sine loop has no product
    assert loop == sass.LoopCounts(instructions=8, tensor_core=1, sync_loads=1, async_loads=2, exp2=1,
                                   sin_cos=1)
    assert loop.per_tensor_core == 8.0


# A program's loop over its tiles, each tile with two loops of products (the dk/dv pass summing dq).
NESTED = """
        .text.kernel:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
        /*0030*/               @P1 BRA `(.L_x_1) ;
        /*0040*/                   STG.E desc[UR4][R4.64], R2 ;
.L_x_2:
        /*0050*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0060*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
        /*0070*/                   MUFU.EX2 R9, R9 ;
        /*0080*/               @P2 BRA `(.L_x_2) ;
        /*0090*/               @P3 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
"""


def test_main_loops_are_the_innermost_loops_with_tensor_core_instructions():
    first, second = sass.main_loops(NESTED)  # not the loop around them
    assert first == sass.LoopCounts(instructions=2, tensor_core=1, sync_loads=0, async_loads=0, exp2=0,
                                    sin_cos=0)
    assert second == sass.LoopCounts(instructions=4, tensor_core=1, sync_loads=0, async_loads=1, exp2=1,
                                     sin_cos=0)


def test_a_kernel_without_tensor_core_loops_has_no_main_loop():
    assert sass.main_loops(SASS.replace("HMMA.16816.F32.BF16", "FFMA")) == []
    assert sass.LoopCounts(3, 0, 0, 0, 0, 0).per_tensor_core == float("inf")


@pytest.mark.parametrize("arch, registers, shared, warps, expected", [
    (90, 254, 94 * 1024, 8, 1),   # registers: 8 warps of 256 fill the register file once
    (90, 128, 16 * 1024, 4, 4),   # registers: 65536 / (128 * 128)
    (80, 64, 60 * 1024, 4, 2),    # shared memory: 164 KB / 61 KB
    (90, 32, 0, 4, 16),           # threads: 2048 / 128
    (90, 16, 0, 1, 32),           # the cap of 32 CTAs
    (90, 250, 0, 4, 2),           # 250 registers are allocated as 256
])
def test_ctas_per_sm(arch, registers, shared, warps, expected):
    assert sass.ctas_per_sm(arch, registers, shared, warps) == expected


def test_mark_main_loops_brackets_each_main_loop_with_its_counts():
    marked = sass.mark_main_loops(SASS).splitlines()
    opening = [i for i, line in enumerate(marked) if "// ---- main loop 0:" in line]
    closing = [i for i, line in enumerate(marked) if "// ---- end of main loop 0" in line]
    assert len(opening) == 1 and len(closing) == 1
    assert "/*0030*/" in marked[opening[0] + 1]  # the loop's first instruction, after its label
    assert "/*00b0*/" in marked[closing[0] - 1]  # its backward branch
    assert str(sass.main_loops(SASS)[0]) in marked[opening[0]]
    assert [line for line in marked if "// ----" not in line] == SASS.splitlines()  # nothing else changes
