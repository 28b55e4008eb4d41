"""Data: GLUE tasks and metrics (`glue`, `metrics`) and tokenised, cached, batched examples (`tokenized`)."""
