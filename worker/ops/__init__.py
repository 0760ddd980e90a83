"""Operations: metrics, stats, health, the HTTP port, logging, failpoints."""
