"""The SQL the Postgres connector installs (`feed migrate`), shipped as package data.

A package only so that wheels carry the files beside `connectors/`, where the migration runner
looks for them; there is no Python here.
"""
