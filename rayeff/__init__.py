"""rayeff: fine-tuning and hyper-parameter optimisation for transformer models on Ray.

    model = rayeff.load("models/sums")   # a `rayeff export` folder or a finished run's: the trained torch module
"""


def load(path):
    """The trained model of a `rayeff export` folder or a finished run's folder (rayeff/export.py), in eval mode."""
    from rayeff.export import load as load_trained_model

    return load_trained_model(path)
