"""Cloud training rounds over the BAIM (Ray Train and in-process runners), resources, publishing."""
