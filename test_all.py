"""The one test file of this project.

Run with `python test_all.py` (stdlib unittest) or `python -m pytest test_all.py`.
Each section below belongs to one component; tests use tiny images, resnet18 and a
few iterations so the whole suite stays under 10 minutes on 2 CPU cores.
"""
import unittest

# ==== data.py / synthetic.py tests (TestSynthetic*, TestData*) ====

# ==== end data ====

# ==== eval.py tests (TestEval*) ====

# ==== end eval ====

# ==== reid.py / agw tests (TestCLI*, TestAGW*) ====

# ==== end cli ====

# ==== methods/nfs.py tests (TestNFS*) ====

# ==== end nfs ====

# ==== methods/cmnas.py tests (TestCMNAS*) ====

# ==== end cmnas ====

# ==== methods/ssft.py tests (TestSSFT*) ====

# ==== end ssft ====

# ==== methods/rfm.py tests (TestRFM*) ====

# ==== end rfm ====

# ==== methods/mce.py tests (TestMCE*) ====

# ==== end mce ====

if __name__ == "__main__":
    unittest.main(verbosity=2)
