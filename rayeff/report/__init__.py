"""`rayeff report`: an HTML page of plots for a run, a sweep or a `bench compare` JSON (page.py, figures.py)."""
