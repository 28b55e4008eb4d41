"""`rayeff plan`: what a job needs per worker, from its model's config alone, before anything is loaded or launched.

    shapes.py    the job's method model built on the meta device (no weights), and what one forward saves
    planner.py   per-worker memory as the tensor account splits it, under the job's ZeRO stage and precision, and the
                 bytes each worker sends per step
"""
