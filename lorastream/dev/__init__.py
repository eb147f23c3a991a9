"""Local services for one machine: a Kafka broker in KRaft mode, its TLS/SCRAM set-up and
S3Proxy, assembled from Maven Central. The tests and benchmarks use them too."""
