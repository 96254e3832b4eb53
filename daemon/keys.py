"""Typed keys for everything the app and its requests share (no string keys anywhere)."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from daemon.auth import Operator, OperatorAuth, Policy
from daemon.events import EventSink
from daemon.filesend import FileSender
from daemon.filestore import FileStore
from daemon.heartbeat import Heartbeat
from daemon.httplite import LiteClient
from daemon.inbound import Inbound
from daemon.links import LinkService
from daemon.metrics import Metrics
from daemon.models import Remote
from daemon.outbox import Outbox
from daemon.peers import PeerClient
from daemon.remotes import Remotes
from daemon.settings import Settings
from daemon.store import Database, GroupCommit
from daemon.uploads import Uploads

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
WRITER = web.AppKey("writer", GroupCommit)
REMOTES = web.AppKey("remotes", Remotes)
PEERS = web.AppKey("peers", PeerClient)
LOCAL_HTTP = web.AppKey("local_http", aiohttp.ClientSession)
FORWARDER = web.AppKey("forwarder", LiteClient)
LINKS = web.AppKey("links", LinkService)
OPERATORS = web.AppKey("operators", OperatorAuth)
EVENTS = web.AppKey("events", EventSink)
METRICS = web.AppKey("metrics", Metrics)
HEARTBEAT = web.AppKey("heartbeat", Heartbeat)
INBOUND = web.AppKey("inbound", Inbound)
OUTBOX = web.AppKey("outbox", Outbox)
FILESTORE = web.AppKey("filestore", FileStore)
UPLOADS = web.AppKey("uploads", Uploads)
FILE_SENDER = web.AppKey("file_sender", FileSender)
POLICIES = web.AppKey("policies", dict[AbstractRoute, Policy])

REQUEST_ID = web.RequestKey("request_id", str)
OPERATOR = web.RequestKey("operator", Operator)
REMOTE = web.RequestKey("remote", Remote)
