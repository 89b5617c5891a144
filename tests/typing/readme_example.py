import enum, msgspec, multispool

class Queue(enum.Enum):            # member values are the queue directory names
    INCOMING = "incoming"
    DONE = "done"

class Job(msgspec.Struct):
    url: str
    tries: int = 0

spoolable = multispool.Spoolable(queues=Queue, metadata=Job)   # durability="full" by default
spool = multispool.Spool.create("jobs.spool", spoolable)       # any directory you may write to

# producer (any process)
spool.enqueue(Queue.INCOMING, Job("https://example.org"), b"payload bytes")

# consumer (any number of processes): wakes on filesystem events, each entry to exactly one
def handle(job: Job, data: multispool.DataFile[bytes]) -> multispool.Save[Job] | multispool.Remove:
    body = data.load()
    ...
    return multispool.REMOVE            # or multispool.Save(job, Queue.DONE)

with spool.reader(Queue.INCOMING, recover=True) as reader:
    reader.iter(handle)                 # blocks; pass stop=threading.Event() to end it
