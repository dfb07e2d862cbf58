"""The status sink: the translator's status with `Programmed` from every sink's readiness,
`lastTransitionTime` kept while a condition holds, handed to a status writer."""
