"""Measuring a result: the paper's metrics (`evaluate`), the shape world with known truth and its built-in
model (`world`, `world_model`), and what runs on them (`experiment`, `demo`, `compare`)."""
