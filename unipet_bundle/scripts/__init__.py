"""UniPET bundle code, instantiated from the JSON configs as ``scripts.<module>.<Class>``.

The bundle root (the folder holding ``configs/`` and ``scripts/``) must be on ``sys.path``:
``python -m monai.bundle run`` adds it, and so do the tests.
"""
