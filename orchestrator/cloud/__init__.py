"""Cloud training rounds: the in-process and Ray Train runners over `baim.loop`, and their resource checks."""
