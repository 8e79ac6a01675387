"""Training: `loop` runs it (setup, step, loop, finish); `loss` is the loss as pure functions; `components` the
models, optimizer and data order; `images` and `data` the photos and the dataset; `cache`, `checkpoint`, `outputs`,
`rundir`, `class_images`, `tokens` and `hub` what a run keeps, saves and owns; `speed` the fast path's switches.
docs/design.md, "A training run, start to end"."""
