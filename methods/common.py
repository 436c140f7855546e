"""Plumbing shared by every method: errors, ResNet stages, ImageNet weights, lr schedule, run/checkpoints."""


class UserError(Exception):
    """A problem the user can fix (a path, a flag value, a file). reid.py prints it as one line and exits 2."""
