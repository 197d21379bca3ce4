"""The core layer: the compiled ops and their statistics table, the optimizers, the functional
API and the pure-torch reference. Importing it loads torch and the op library (`instrumented_adam._C`)."""
