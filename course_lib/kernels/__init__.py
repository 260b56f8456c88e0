"""Speed-only kernels, each used from its lesson file behind one visible switch (the lesson file is the reference)."""
