"""The first module run_world's fork server imports (parallel.local_world): the third-party notices
that the libraries print at import stay behind --verbose there too, as in any relaxrec process. The
server is a process of its own, which lives as long as the worlds it forks; its ranks take the
caller's environment."""

import os

from ..console import quiet_third_party
from ..runtime import library_settings

os.environ.update(library_settings())
quiet_third_party()
