"""The teacher service, ``teacher-serve``, and its client, ``teacher-push``.

A request flows through: ``app`` (the routes; refusals mapped to statuses) → ``runtime``
(``TeacherService``: decode with ``protocol``/``wire``, validate with ``signature``, answer hits
from the cache store) → ``batcher`` (one queue, one worker thread) → ``teacher`` (the members on
the device, combined by an ``ensemble.Combiner``; loaded by ``loading``) → ``store`` (journal,
group commit, the cache writer). ``cli`` and ``settings`` start it, ``client`` talks to it,
``launch`` runs it as a child process, ``metrics`` counts.
"""

__version__ = "0.1.0"
