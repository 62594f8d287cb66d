package dev.sessionaffinity.tomcat;

import java.util.Arrays;
import java.util.concurrent.atomic.LongAdder;

import javax.management.Attribute;
import javax.management.AttributeList;
import javax.management.AttributeNotFoundException;
import javax.management.DynamicMBean;
import javax.management.MBeanAttributeInfo;
import javax.management.MBeanInfo;
import javax.management.MBeanNotificationInfo;
import javax.management.MBeanOperationInfo;
import javax.management.ReflectionException;

/**
 * The valve's counters, readable over JMX: one read-only long attribute per
 * {@link Counter}, named like {@code sessionsRestored}.
 */
final class Counters implements DynamicMBean {

    private final LongAdder[] values = new LongAdder[Counter.values().length];
    private final MBeanInfo info;

    Counters() {
        Arrays.setAll(values, i -> new LongAdder());
        MBeanAttributeInfo[] attributes = Arrays.stream(Counter.values())
                .map(c -> new MBeanAttributeInfo(c.attribute, "long", c.description, true, false, false))
                .toArray(MBeanAttributeInfo[]::new);
        info = new MBeanInfo(Counters.class.getName(), "Session affinity valve counters", attributes, null,
                new MBeanOperationInfo[0], new MBeanNotificationInfo[0]);
    }

    void add(Counter counter) {
        values[counter.ordinal()].increment();
    }

    void add(Counter counter, int amount) {
        values[counter.ordinal()].add(amount);
    }

    long get(Counter counter) {
        return values[counter.ordinal()].sum();
    }

    @Override
    public Object getAttribute(String name) throws AttributeNotFoundException {
        for (Counter counter : Counter.values()) {
            if (counter.attribute.equals(name)) {
                return get(counter);
            }
        }
        throw new AttributeNotFoundException(name);
    }

    @Override
    public AttributeList getAttributes(String[] names) {
        AttributeList list = new AttributeList();
        for (String name : names) {
            try {
                list.add(new Attribute(name, getAttribute(name)));
            } catch (AttributeNotFoundException e) {
                // JMX convention: unknown names are left out of the list
            }
        }
        return list;
    }

    @Override
    public void setAttribute(Attribute attribute) throws AttributeNotFoundException {
        throw new AttributeNotFoundException(attribute.getName() + " is read-only");
    }

    @Override
    public AttributeList setAttributes(AttributeList attributes) {
        return new AttributeList();
    }

    @Override
    public Object invoke(String action, Object[] params, String[] signature) throws ReflectionException {
        throw new ReflectionException(new NoSuchMethodException(action));
    }

    @Override
    public MBeanInfo getMBeanInfo() {
        return info;
    }
}
