"""Root pytest configuration, shared by the unit tests and nbval over solutions/.

Notebook kernels started by nbval inherit this process's environment, so the deterministic
notebook environment (tqdm off, fixed hash seed) is set here, the same one `course execute`
uses when storing the outputs that nbval compares against.
"""

from course_lib.instructor.execute import apply_notebook_env

apply_notebook_env()
