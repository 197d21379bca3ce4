# Sourced by install.sh and test.sh. build_progress LOG: keeps a build's full output in LOG and
# shows only its progress: ninja's "[n/N]" steps (as the file compiled) and setup.py's own
# "instrumented_adam: ..." lines (the ISA copies of the CPU kernel).
build_progress() {
  tee "$1" | grep --line-buffered -E '^ *(\[[0-9]+/[0-9]+\]|instrumented_adam: )' \
    | sed -u -E 's#^ *(\[[0-9]+/[0-9]+\]) .* -c (-c )?([^ ]*/)?([^ /]+\.(cpp|cu)) .*#   \1 compiling \4#; s#^ *instrumented_adam: #   #' \
    || true
}
