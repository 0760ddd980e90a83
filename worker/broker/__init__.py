"""The broker's side: connection, topology, the pull loop, validation, the Result publisher, dead letters. Never imports torch."""
