# Sourced by the GPU scripts: the Hopper wheels (../shared/tools/hopper_wheels.sh fills .hopper,
# .hopper-a and .hopper-b) installed into /tmp/site over two calls on one warm device machine,
# as a call carries at most 64 MiB:
#   call 1: carry .hopper-a (and what that call runs): its part of the CUTLASS DSL's CUDA 13
#           libraries is copied to /tmp, which outlives the call on a warm machine;
#   call 2: carry .hopper and .hopper-b: both parts unpacked, the small wheels installed.
# A later call on the same warm machine finds them installed and only sets the path.
S=/tmp/site
mkdir -p $S
if [ -d .hopper-a ] && ls .hopper-a/cutlass-cu13.part.* >/dev/null 2>&1; then
  cp .hopper-a/cutlass-cu13.part.* /tmp/ && echo "hopper: part 1 of the CUTLASS DSL libraries kept in /tmp"
fi
if [ ! -d $S/nvidia_cutlass_dsl ] && [ -d .hopper-b ] && ls /tmp/cutlass-cu13.part.* >/dev/null 2>&1; then
  cat /tmp/cutlass-cu13.part.* .hopper-b/cutlass-cu13.part.* | xz -d | tar -x -C $S \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target $S .hopper/*.whl \
    && echo "hopper: flash-attn-4, the CUTLASS DSL, quack and torchao installed in $S"
fi
if [ -d $S/nvidia_cutlass_dsl ]; then
  # The DSL's own .pth file (which adds dsl_packages) is not read from PYTHONPATH: named here.
  export PYTHONPATH=$S:$S/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
