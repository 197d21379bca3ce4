"""The demo layer: built-in training tasks and the `instrumented-adam` command line."""
