"""Cloud training rounds: the in-process and Ray Train runners over `baim.loop`, and their resource checks."""

import time

# When this process began importing the cloud runners: in a Ray Train worker, the start of its imports
# (torch and the rest), which the round's fixed costs report as a phase of their own.
IMPORT_STARTED_AT = time.time()
