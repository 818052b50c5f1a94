"""The configuration of the actors' process, read once when ``actors`` is imported.

Actor declarations need it at import time (the queue name); everything else in
``actors`` uses this same object rather than reading the environment again.
"""

from migration.config import Config

CONFIG = Config.from_env()
