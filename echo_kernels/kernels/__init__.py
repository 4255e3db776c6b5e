"""Kernels and their launchers (Triton, and the blocked CPU attention); echo_kernels/<op>.py
registers them."""

# Head widths the Triton attention kernels are built for: their tiles span the head as power-of-two
# ranges, and a product's inner dimension must be 16 or more (h/2 >= 16). Other widths up to the
# largest are served zero-padded to the next of these (echo_kernels.attention).
ATTENTION_HEAD_WIDTHS = (32, 64, 128)

# n of the bias table in Echo's default configuration (EchoConfig.max_rel_dist): the ahead-of-time
# report compiles the backward's bias-diagonal sums for its (2n - 1)-row table.
ECHO_MAX_REL_DIST = 15

# Compiler options every Triton launch passes, and the ahead-of-time compile with it (echo_kernels.aot):
# multiplies and adds fused into FMAs. Triton fuses them by default up to 3.9, which warns that 3.10 will
# not; the tile tables, the report's counts and the fp32 products' rounding all assume fused ones
# (docs/model.md, "Static report").
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def launch_options(config: dict) -> dict:
    """The keyword arguments a launch passes besides its constexprs: its tile-table row's num_warps and
    num_stages, and COMPILE_OPTIONS."""
    return {"num_warps": config["num_warps"], "num_stages": config["num_stages"], **COMPILE_OPTIONS}
