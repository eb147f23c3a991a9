"""Local services for one machine: a Kafka broker in KRaft mode (``broker``), its TLS/SCRAM
set-up (``secure``) and S3Proxy (``s3proxy``), assembled from Maven Central (``maven``,
``jars``), with one free-port helper (``ports``) and one process runner (``process``).

The tests, ``bench/`` and the soak use them too, and the helpers that serve only them
live here as well, so that the benchmarks never import the tests: worker processes
(``workers``), topics (``topics``), learning events (``events``), hostile records
(``hostile``) and lineage checks (``lineage_checks``).
"""
