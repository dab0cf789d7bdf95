"""Settings for every test process (and the processes tests start, which inherit them).

Quantized layers choose their CPU matmul path from the fixed row cutoffs, not from timing
(gptj/model/matmul_probe.py): a test's result must not depend on how loaded the machine is, and
no test writes to the user's cache. The probe's own tests turn it on with a file of their own."""

import os
import tempfile

os.environ["GPTJ_MATMUL_PROBE"] = "0"
os.environ["GPTJ_MATMUL_PROBE_CACHE"] = os.path.join(tempfile.gettempdir(), f"gptj-tests-matmul-{os.getpid()}.json")
