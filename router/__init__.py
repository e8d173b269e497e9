"""The global router: gRPC front end, request table, dispatcher, metrics."""
