"""HTTP blueprints: the SHL data plane, the management API and (later) FHIR operations."""
