"""Working with Ray clusters: job submission (Jobs API), storage locations, live metrics and the status board."""
