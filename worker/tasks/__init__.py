"""Job handlers, one module per kind; `app.jobs.kinds` names each kind's handler."""
