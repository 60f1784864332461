"""`migrator bench SCENARIO`: repeatable measurements, printed as tables and written as JSON."""
