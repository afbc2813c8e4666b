"""The stages of a job's life, one room each (see "How kinod is built" in the README).

    watcher -> intake -> scheduler -> running -> ending -> outbox/ and the spool
                 ^            ^                     |
             recovery       fleet, stops            +-> back to the scheduler (retry)

Each stage owns its own state and reaches the others only through their public
methods, by way of the shared ``Context``.
"""
