"""The control core: desired state (model), its durable store, Maglev rings, reconcile."""
