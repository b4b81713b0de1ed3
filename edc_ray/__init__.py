"""edc-ray: Ray-native dataset condensation (EDC and its design space)."""
