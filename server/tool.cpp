// see tool.h
