"""Development tooling: the registry simulator, the local launcher and the demo.

Nothing the workers, the API or the scheduler import lives here, and the container image
leaves this package out: ``registry-migrator simulator`` and ``demo`` need a source checkout.
"""
