"""The first module run_world's fork server imports (parallel.local_world): the third-party notices
that the libraries print at import stay behind --verbose there too, as in any relaxrec process."""

from ..console import quiet_third_party

quiet_third_party()
